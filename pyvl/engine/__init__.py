"""The engine: everything that outlives one call.

One job per module, imports pointing down (engine -> models -> ops -> kernels), for example:
  blocks.py    block bookkeeping of the paged KV pool: free list, ref counts, chained prefix hashes, LRU, tails
  features.py  the image-feature LRU keyed by image digest, bounded in bytes, and the digest helpers
Import from the modules themselves: this package exports nothing, so importing it stays cheap.
"""
