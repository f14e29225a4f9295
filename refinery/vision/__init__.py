"""Images: the classifier that gives image documents and request images their vectors and labels
(``classifier``), and the image-generation model (``diffusion``)."""
