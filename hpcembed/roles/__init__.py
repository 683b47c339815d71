"""The real-time drivers of the three roles, each over a Transport: the conductor's loop (rank 0), the tokenizer
rank (read, tokenize, send), the encoder rank (batch, encode, write shards). The rules they follow are the protocol
cores' (hpcembed/protocol)."""
