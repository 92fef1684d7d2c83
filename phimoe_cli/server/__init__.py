"""`phimoe serve`: the local model behind an OpenAI-compatible HTTP API (protocol: the wire format;
worker: the thread that runs the engine; app: the routes; main: the command)."""
