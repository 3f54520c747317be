from backends.echo.backend import EchoBackend
from backends.runtime import run

run(EchoBackend())
