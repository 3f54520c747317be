from backends.runtime import run
from backends.whisper.backend import WhisperBackend

run(WhisperBackend())
