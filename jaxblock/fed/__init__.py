"""The federated core: pure math."""
