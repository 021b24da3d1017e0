"""The external memory: encoders, scene and object banks, index, retrieval."""
