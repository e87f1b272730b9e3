"""TensorFlow Serving's gRPC API: our own server for machines without ``tensorflow_model_server``
and the client every friendrec component uses (it works unchanged against the official server)."""
