"""Backend processes: one per loaded model, each serving the gRPC contract in protos/."""
