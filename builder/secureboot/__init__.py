"""Secure Boot with the customer's own keys: key sets, Authenticode, signers, varstores."""
