"""The guard img2dataset downloads run under (see sitecustomize.py in this folder)."""
