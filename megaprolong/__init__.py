"""megaprolong: continue Llama-3 pre-training to 512K-token context with the ProLong recipe on megatron-core."""

from megaprolong.runtime.noise import silence_known_noise

silence_known_noise()

__version__ = "0.1.0"
