# Stub of the Cython binding (pyexec/_native.pyx): its functions are the cffi binding's, signature for
# signature, so they are declared once, there (and both are checked against native.Binding).
from pyexec._native_cffi import *
