"""condense: turn a web-scale image-text corpus into an informative coreset (the Bunny recipe).

Importing the package stays light: Ray, faiss and torch load only where they are used.
"""

__version__ = "0.1.0"
