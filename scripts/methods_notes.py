"""Why a method or mode helps or does not, one note per student and method, written by hand from the recorded
run (docs/methods.md computes the verdict before each note from the rows, so the verdict follows a re-run; these
notes do not)."""

NOTES: dict[str, str] = {
    "resnet:kd": "The ResNet (95%) is already better than its teacher (91.9%): the soft targets add a little.",
    "resnet:hints": "Likely reason: the teacher is weaker than the student, and its features (7-pixel patch tokens on "
                    "a 4x4 grid) are coarser than the CNN's own; regressing onto them constrains more than it guides "
                    "(the pilot preferred the smallest weight; larger ones were worse).",
    "resnet:hints_norm": "Same reason as plain hints; normalising only removes the scale mismatch.",
    "resnet:hints_stage": "Stage 1 spends 30% of the steps fitting a weaker teacher's features with no task signal; "
                          "the classifier then has 336 steps instead of 480.",
    "resnet:at": "A 4x4 map of where a ViT's activations are large tells a CNN little it does not find itself; "
                 "weights of 10 and 100 hurt in the pilot (0.940, 0.794).",
    "resnet:relation": "Not applicable, not a crash: similarity preservation reads [batch, tokens, width] hidden "
                       "states through the layer map; a ResNet's are feature maps with no hidden_size, and hf_kd "
                       "refuses at construction with a clear message.",
    "resnet:input_grad": "Within seed noise, at 2.7x KD's time per step (a backward through the teacher and a "
                         "double backward through the student); weight 1,000 fell to 0.732 in the pilot.",
    "resnet:great": "Within noise, at the highest cost per step, 3.0x KD (both input gradients, as for Sobolev, "
                    "plus the discriminator).",
    "resnet:multiview": "Most of the gain is the augmentation: without a teacher the same views give +0.8 over the "
                        "baseline on average; consistency with the teacher adds +0.4, not on every seed.",
    "resnet:baseline_multiview": "Augmentation alone; two of three seeds gain.",
    "resnet:reg_kd": "Two seeds gain, the third ties; the spread over seeds shrinks (R² ± 0.0004 vs ± 0.0024). "
                     "The teacher was trained on the student's digits, so its outputs there are close to the "
                     "labels: output matching mostly adds a smoothed second target, and a teacher worse than the "
                     "student on held-out digits (R² 0.931 vs 0.951) cannot transfer much more.",
    "vit:kd": "Logits alone help the small ViT little and unreliably (seed spread ± 3.7 points).",
    "vit:hidden": "Token states through a learned projection give the 2-layer ViT the representation it cannot "
                  "learn from 1,000 digits (the pilot preferred the largest weight, 10).",
    "vit:hints": "The same idea as hidden states (MSE on two token layers); positive on average but one seed lost.",
    "vit:hints_norm": "Better than MSE hints here (+3 points on average); likely reason: a scale-free target is "
                      "easier for a narrower student to follow through its adapter.",
    "vit:hints_stage": "FitNets' two stages give the best hint result and the smallest spread; likely reason: the "
                       "features are fitted before the soft targets pull on them.",
    "vit:at": "Where the teacher's token activations are large is a locality prior a ViT trained on 1,000 digits "
              "lacks.",
    "vit:attention": "The largest gain: the teacher's attention rows tell the student's layers which patches to "
                     "look at, exactly the inductive bias a small ViT lacks on little data (pilot: weight 0.1 -> "
                     "0.664, 100 -> 0.790). It costs 1.14x KD per step, most of it the switch to eager attention "
                     "(plain KD on eager attention: 1.10x).",
    "vit:kd_eager": "Accuracy differs from plain KD only by the numerics of eager vs SDPA attention.",
    "vit:relation": "Batch-similarity structure is a weak signal at batch 64 with mean-pooled tokens: a small "
                    "average gain, not on every seed (very stable across seeds, though).",
    "vit:input_grad": "Hurts on every seed, and more the larger the weight (pilot: 10 -> 0.566, 1,000 -> 0.206): "
                      "likely reason: the teacher's per-pixel gradients come from another model with its own 7x7 "
                      "patch embedding, and forcing the student's to match them fights the task instead of helping.",
    "vit:great": "Consistent only because at weight 0.01 the term barely changes training (+0.5 points, under "
                 "the seed spread); larger weights were worse in the pilot; 2.8x KD's time per step.",
    "vit:multiview": "Augmentation alone does not help this ViT (next row); with the teacher labelling the shifted "
                     "views it helps, so here the consistency term, not the augmentation, is what works.",
    # the training modes (the rows of scripts/methods_modes.py)
    "resnet:multi_teacher": "The two teachers really differ (ViT 90.4% / ResNet 98.2% on the validation digits), yet the "
                            "mixture is no better than either alone: the ResNet student already beats the ViT "
                            "teacher, and the ResNet teacher alone (next rows) is the better single teacher.",
    "resnet:multi_confidence": "Weighting each example by the teacher's probability of the true label leans on the "
                               "ResNet teacher where the ViT is unsure; no measurable gain over the equal mixture.",
    "resnet:kd_resnet_teacher": "The stronger teacher gives the best ResNet of the KD rows on average, not on "
                                "every seed.",
    "resnet:route": "Early snapshots (epochs 2 and 6) are weaker teachers than the final one; for a student that "
                    "already beats the final teacher the easier route only takes away two thirds of its signal.",
    "resnet:born_again": "Generation 0 is the no-teacher ResNet; teaching the same architecture with its own "
                         "predictions adds nothing here (3x the steps for the same accuracy).",
    "resnet:mutual": "A small but consistent gain without any teacher, at about 2x the step time (two models "
                     "train); the best of the two models is what a DML run would report.",
    "resnet:self_distill": "The exit after the first stage acts as deep supervision of the early features and "
                           "costs little; the most reliable no-teacher gain for the ResNet.",
    "vit:multi_teacher": "Worse than KD from the ViT teacher alone: the ResNet teacher's soft targets (next rows) "
                         "hurt the ViT student, and the mixture inherits part of that. Likely reason: a CNN's "
                         "confident, sharp outputs carry little of the similarity structure a small ViT can use.",
    "vit:multi_confidence": "Confidence weighting favours the (more often right) ResNet teacher, whose targets suit "
                            "the ViT less: worse than the equal mixture.",
    "vit:kd_resnet_teacher": "A better teacher on accuracy (98.2% vs 90.4% on validation) is a worse teacher for the ViT student "
                             "(below no teacher on average).",
    "vit:route": "Positive on average but not on every seed (one seed lost 2.8 points); the early snapshots' softer "
                 "outputs may suit the small ViT, but three seeds cannot separate that from noise.",
    "vit:progressive": "Clearly worse: with stages by fractions of training the logit terms start at two thirds, "
                       "so the classifier has 160 steps at the tail of the cosine schedule; matching hidden states "
                       "first does not make up for it. The same hidden-state weight without stages (the 'hidden' "
                       "row) is the best ViT signal after attention. Stages need more steps than this budget.",
    "vit:born_again": "Each generation gains a little on every seed (generation 2 +1.4 points over generation 0 on "
                      "average), at 3x the training steps; plain KD from the real teacher gets about as far in "
                      "one generation.",
    "vit:mutual": "No consistent gain for the small ViT (one seed +1.9, the others within 0.5 points).",
    "vit:self_distill": "Within seed noise for a 2-layer ViT (an exit after layer 1 of 2 is almost the whole "
                        "model).",
    "tiny:kd": "In the capacity-gap setting plain KD does not help: the 5K-parameter ViT learns no better from the "
               "145K-parameter teacher's soft targets than from the labels at the same 960 steps.",
    "tiny:chain": "The assistant (the teacher's first layer, 45K parameters, started from the teacher's weights) "
                  "reaches about 84% after its stage, but the student then has only half the steps: at equal "
                  "total steps the chain loses clearly to both direct KD and no teacher. The seeds' claim (an "
                  "assistant bridges the gap) does not hold at this budget; a chain pays off only when the "
                  "student's own steps are not the bottleneck (equal student steps, or an assistant already "
                  "trained).",
    "vit:baseline_multiview": "Shifted views without a teacher do not help the small ViT; note that hf_kd's "
                              "random_shift fills the border with 0, which is not the normalised background "
                              "(-0.424), so shifted views carry a grey band.",
}
