from backends.piper.backend import PiperBackend
from backends.runtime import run

run(PiperBackend())
