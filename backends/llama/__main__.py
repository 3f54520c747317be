from backends.llama.backend import LlamaBackend
from backends.runtime import run

run(LlamaBackend())
