"""Stateful Azure OpenAI objects: each lives in the one resource that created it.

A stored response, a conversation, a file, a batch, a vector store, an assistant or thread exists
only in the backend that answered its creation, so a call naming one must reach that backend:
- `ids`: which ids a call names (path or body) and whether it may create one; calls that can do
  neither (chat, embeddings) are told apart by their path alone, at no cost;
- `records`: (pool, object id) -> backend and creating client, in memory (one instance);
- `table`: the same records shared through Table Storage (the cooldowns' account and table);
- `watch`: the new object's id, read from the answer as it is relayed;
- `router`: the holder pinned (its 429 is the client's answer, never a failover), unknown ids
  looked for, another client's objects refused as if they did not exist.
"""
