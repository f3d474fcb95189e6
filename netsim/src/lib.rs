//! netsim: a virtual network that runs the real `overlay` peer code.
