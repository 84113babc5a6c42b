"""The engine: loading a model, its blocks and prompts, the perturbations and their hooks, the objective, the
discovery methods and their optimiser, steered generation, a discovery run and its directory, Ray.

Imports the top level and melbo.io.
"""
