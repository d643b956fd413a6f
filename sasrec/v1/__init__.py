"""Generated gRPC code for protos/sasrec/v1/recommender.proto (regenerate: see tests/serving/test_proto.py)."""
