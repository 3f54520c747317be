"""The Piper backend: text to speech with Piper voices (VITS, ONNX) and the espeak-ng program."""
