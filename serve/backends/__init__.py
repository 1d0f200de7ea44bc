"""Other engines behind the server's Backend protocol (serve.async_engine.Backend): vLLM."""
