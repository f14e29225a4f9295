"""Reading a corpus: scanning folders, parsing files (text, HTML, PDF, images by OCR) in an
isolated process, and chunking. Ingestion and the online path (images in requests) share it."""
