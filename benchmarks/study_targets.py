"""Plugin targets for policy studies (RESULTS-reproduce §7e), e.g. `policy_study.py ... --set
target.spec=study_targets:hinge_67` (benchmarks/ is on the bench's path).

`hinge_67`: "67" with a hinge in place of kappa's softplus, Phi = -mean(relu(-kappa * S * delta)), so that the
gradient counts only the pixels the SFT leaves on the wrong side; its report is the pattern's (pixel accuracy).
"""
import torch
import torch.nn.functional as F

from dpg.targets import Target, get_target, output_matrix


def hinge_67(base_model, tokenizer=None, kappa=20.0, **options):
    base = get_target("pattern:67", base_model, tokenizer, kappa=kappa, **options)
    ids = torch.tensor(base.token_ids)
    goal = torch.as_tensor(base.image(base_model)["goal"])
    rows, off = goal.shape[0], options.get("hidden_offset", 0)

    def patch(model):
        W = output_matrix(model)
        return W[ids.to(W.device), off:off + rows].T

    P0 = patch(base_model).detach().clone()

    def phi(model):
        P = patch(model)
        return -F.relu(-kappa * goal.to(P) * (P - P0.to(P))).mean()

    def report(model):
        with torch.no_grad():
            return {**base.report(model), "phi": float(phi(model))}

    return Target("hinge:67", phi, report, base.image, base.token_ids)
