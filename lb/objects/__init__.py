"""Stateful Azure OpenAI objects: each lives in the one resource that created it, and is its creator's.

A stored response, a conversation, a file, a batch, a vector store, a container... exists only in
the backend that answered its creation, so a call naming one must reach that backend, and only
for the client that created it:
- `routes`: the table (as data) of routes and body fields that name objects, and the strict
  reading of a call: ids in Azure's shape, plain paths, UTF-8 JSON bodies;
- `records`: (pool, object id) -> backend and creating client, inserted once, never replaced;
- `table`: the same records shared through Table Storage (the cooldowns' account and table);
- `watch`: the new object's id, read from the creating answer as it is relayed;
- `reasoning`: the reasoning items of a Responses answer (only its `output[]`'s), read as it is relayed;
- `router`: the holder pinned, another client's object refused as if it did not exist, unknown
  ids refused with several clients, lists merged across the pool per client.
"""
