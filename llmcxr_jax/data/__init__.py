"""Data: report parsing, dataset builders (MIMIC-CXR, Dolly-15k, phantoms) and the Grain input pipeline."""
