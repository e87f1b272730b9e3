"""Real-time refresh over Kafka: friendship and profile events -> Feast online features (feature
updater) -> fresh embeddings through TF Serving (embedding refresher) -> Milvus (sink)."""
