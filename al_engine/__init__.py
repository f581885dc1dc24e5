"""The active-learning engine: datasets, models, training, query strategies and the round loop.

It imports nothing from the web side and can be used as a library on its own.
"""
