"""The gallery index (index.yaml), shipped with the package so an installed Hearth finds it."""
