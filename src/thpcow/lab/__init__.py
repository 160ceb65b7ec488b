"""Real-kernel lab: small scenarios run on the running Linux kernel to validate the simulator.

All kernel I/O goes through :mod:`thpcow.lab.procfs` (one fs layer with a ``root`` override
so tests can point it at a fake tree). The lab only *reads* sysfs; it never changes a knob.
"""
