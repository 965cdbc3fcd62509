"""The reference MoE engine on CPU (``mpirun -n N python -m eplb_engine``): see engine.py."""
