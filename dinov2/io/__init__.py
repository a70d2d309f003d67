"""Mechanics shared by the trainer, the tools and the curation pipeline: safe reads of user files and the one image
decoder (``files``, ``images``), atomic writes (``atomic``), typed YAML configs (``yaml_config``) and the tools'
command-line plumbing (``cli``).

The lowest layer of the project: it imports nothing else from it.
"""
