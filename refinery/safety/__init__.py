"""Prompt-injection protection: the guard that screens user turns (``guard``) and the text
screens for documents and retrieved chunks (``screening``)."""
