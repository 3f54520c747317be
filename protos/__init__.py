"""The gRPC contract between the gateway and the backends, with its generated code."""
