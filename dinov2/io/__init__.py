"""Mechanics shared by the trainer, the tools and the curation pipeline: safe reads of user files and the one image
decoder (``files``, ``images``), atomic writes (``atomic``), typed YAML configs (``yaml_config``), the tools'
command-line plumbing (``cli``), output-directory ownership (``lock``) and one-line error descriptions (``errors``).

The lowest layer of the project: it imports nothing else from it.
"""
