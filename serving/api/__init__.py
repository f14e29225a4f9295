"""The HTTP side: the BentoML services (OpenAI-compatible routes, RAG), cache, limits,
accounting, the traffic log, and building the Bento that packages them."""
