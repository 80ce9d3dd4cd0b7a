"""Small torch references of the two attention-MIL baselines, written from the published model
definitions, to check hipt_jax.models.mil against (weights copied over by the tests).

- Gated attention MIL (Ilse, Tomczak & Welling, 2018, "Attention-based deep multiple instance
  learning", the GatedAttention model): H = ReLU(Linear(x)); A = softmax_over_instances(
  w^T (tanh(V H) * sigmoid(U H))); z = A H; logits = Linear(z).
- CLAM single branch (Lu et al., 2021; mahmoodlab/CLAM models/model_clam.py CLAM_SB): the same
  gated attention on fc(x) = ReLU(Linear(x)) (Attn_Net_Gated: attention_a, attention_b,
  attention_c), bag classifier on A @ h, and per class a 2-way instance classifier: for the bag's
  class the top-k attended instances are positives and the bottom-k negatives; for other classes
  (subtyping) the top-k are negatives; cross-entropy, averaged over classes.
"""
import torch
import torch.nn.functional as F
from torch import nn


class GatedABMIL(nn.Module):
    def __init__(self, in_dim, embed, attn_hidden, n_classes):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed)
        self.attention_V = nn.Linear(embed, attn_hidden)
        self.attention_U = nn.Linear(embed, attn_hidden)
        self.attention_weights = nn.Linear(attn_hidden, 1)
        self.classifier = nn.Linear(embed, n_classes)

    def forward(self, x):
        h = F.relu(self.fc(x))                                   # [N,L]
        a = self.attention_weights(torch.tanh(self.attention_V(h)) * torch.sigmoid(self.attention_U(h)))
        a = F.softmax(a.transpose(1, 0), dim=1)                  # [1,N]
        return self.classifier(a @ h)[0], a[0]


class CLAMSBRef(nn.Module):
    def __init__(self, in_dim, embed, attn_hidden, n_classes, k_sample):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed)
        self.attention_a = nn.Linear(embed, attn_hidden)
        self.attention_b = nn.Linear(embed, attn_hidden)
        self.attention_c = nn.Linear(attn_hidden, 1)
        self.classifiers = nn.Linear(embed, n_classes)
        self.instance_classifiers = nn.ModuleList([nn.Linear(embed, 2) for _ in range(n_classes)])
        self.k_sample, self.n_classes = k_sample, n_classes

    def inst_eval(self, A, h, classifier):
        top_p = h[torch.topk(A, self.k_sample)[1][-1]]
        top_n = h[torch.topk(-A, self.k_sample)[1][-1]]
        targets = torch.cat([torch.ones(self.k_sample), torch.zeros(self.k_sample)]).long()
        return F.cross_entropy(classifier(torch.cat([top_p, top_n])), targets)

    def inst_eval_out(self, A, h, classifier):
        top_p = h[torch.topk(A, self.k_sample)[1][-1]]
        return F.cross_entropy(classifier(top_p), torch.zeros(self.k_sample).long())

    def forward(self, x, label):
        h = F.relu(self.fc(x))
        A = self.attention_c(torch.tanh(self.attention_a(h)) * torch.sigmoid(self.attention_b(h)))
        A = F.softmax(torch.transpose(A, 1, 0), dim=1)           # [1,N]
        total = 0.0
        for i, clf in enumerate(self.instance_classifiers):
            total = total + (self.inst_eval(A, h, clf) if i == label else self.inst_eval_out(A, h, clf))
        return self.classifiers(A @ h)[0], A[0], total / self.n_classes
