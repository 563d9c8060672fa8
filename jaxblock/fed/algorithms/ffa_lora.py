"""FFA-LoRA (Sun et al. 2024): FedIT with A frozen at the shared seeded init; only B trains and is
averaged. (The ParaBlock paper's prose says B is fixed and A trained; FFA-LoRA's own paper fixes
A, which makes the average exact: mean(B_i) A = mean(B_i A).)"""

from jaxblock.fed.algorithms.fedit import FedIT


class FFALoRA(FedIT):
    name = "ffa_lora"
    trains = r".*_lora_b"
