"""The external memory: encoders, scene and object banks, index, retrieval.

encoders   frozen CLS key encoders and dense extractors (clip, dino, maskclip, tiledclip)
pooling    object tokens: dense features averaged under segment masks
bank       the bank directory (manifest + memory-mapped .npy arrays), written atomically
index      FAISS HNSW / flat index in the bank; blocked exact top-k for the neighbour cache
retrieval  leak-free Retriever, NeighborCache, MemoryAttacher (dataset dict -> tokens)
build      dataset -> banks -> index, optionally sharded over submitit jobs
viz        retrieval figures (paper Fig. 3 / Fig. 4)
tokens     how retrieved memory reaches the model (owned by the lead)

Submodules are imported on use: ``import maps.memory`` stays cheap.
"""
