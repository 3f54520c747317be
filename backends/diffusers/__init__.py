"""The Diffusers backend: text-to-image pipelines, images back as PNG bytes."""
