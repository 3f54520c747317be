from backends.runtime import run
from backends.transformers.backend import TransformersBackend

run(TransformersBackend())
