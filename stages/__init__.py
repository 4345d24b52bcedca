"""Würstchen batch stages: text encoding, Stage C, Stage B/A, and the writers."""
