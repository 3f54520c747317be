from backends.diffusers.backend import DiffusersBackend
from backends.runtime import run

run(DiffusersBackend())
