"""`hearth doctor` and GET /system: this machine for running models.

`hardware` reads the CPU, memory, GPUs, disk and sensors; `engines` the installed engines and
this machine's speed, measured in short-lived child processes (`child`); `models` every gallery
model's fit and expected speed; `advice` what it all means; `report` puts them together.
Nothing is imported here: `child` runs as `python -m gateway.system.child` and stays light.
"""
