"""The retrieval service's gRPC contract (``recommender.proto``) and its generated stubs
(``make proto``; checked by tests/test_protos.py)."""
