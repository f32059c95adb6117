"""Performance kernels of the core maths on plain arrays, tested equal to the plain composition."""
