"""File mechanics shared by the trainer, the tools and the curation pipeline: safe reads of user files and the one
image decoder.

The lowest layer of the project: it imports nothing else from it.
"""
