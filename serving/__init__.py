"""Online serving: the TF Serving-protocol model server, the Milvus embedding index and the gRPC
retrieval service (``FriendRecommender``) that joins Feast, TF Serving and Milvus."""

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before anything imports TensorFlow)
