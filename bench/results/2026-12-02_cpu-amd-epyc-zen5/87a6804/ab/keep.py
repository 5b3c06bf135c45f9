import ctypes
m=ctypes.CDLL(None).mallopt; m.argtypes=[ctypes.c_int,ctypes.c_int]
assert m(-3, 32*2**20) and m(-1, 2**31-1)
