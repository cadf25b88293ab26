"""Small, stable building blocks shared by every step. Imports nothing else from mathctl."""
