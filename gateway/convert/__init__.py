"""Making new models from ones you have: `hearth models quantize` and `hearth models convert`.

`make` plans and carries out both (staging, output check, placing the new model); `types` reads
the quantization types of the installed llama-cpp-python; `source` checks a Hugging Face folder;
`converter` fetches llama.cpp's converter into a cache; `process` runs and ends child processes;
`worker` (quantize, check) and `run_converter` are those children, so that libllama and the
converter never run in the gateway's own process. Kept free of imports here: the children import
this package too.
"""
