"""Where the models come from: packaged defaults, local folders, identities.

``resolve.py`` finds the embedding and generation models (the defaults ship inside PyPI
packages: nothing is fetched from a model hub) and prepares the generation model once.
"""
