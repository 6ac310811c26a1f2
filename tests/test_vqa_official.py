"""The VQA accuracy against a port of the official ``vqaEval.py`` (GT-Vision-Lab/VQA), both versions.

``OfficialVQAEval`` below is written from ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` at
a013f00 (2021-03-11, the latest) and at 458a8b2 (2016-10-08): the same tables and the same two text
functions, and the ``evaluate`` loop of each version, run over annotation-style dictionaries (ten
answers with their ``answer_id``, as the annotation files hold them, so that ``item != gtAnsDatum``
leaves out exactly one annotator). It shares no code with ``beit3``.
"""
from __future__ import annotations

import random
import re

import pytest

from beit3.metrics.vqa import VQA_EVAL_VERSIONS, vqa_accuracy, vqa_accuracy_by_type

_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())


class OfficialVQAEval:
    """``VQAEval`` of vqaEval.py; ``version`` picks the 2021 or the 2016 ``evaluate`` loop."""

    def __init__(self, gts: dict, res: dict, version: str, n: int = 2):
        self.gts, self.res, self.version, self.n = gts, res, version, n
        self.accuracy: dict = {}
        self.evalQA: dict = {}
        self.contractions = dict(_CONTRACTIONS)
        self.manualMap = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                          "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
        self.articles = ["a", "an", "the"]
        self.periodStrip = re.compile(r"(?!<=\d)(\.)(?!\d)")
        self.commaStrip = re.compile(r"(\d)(\,)(\d)")
        self.punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                      "@", "`", ",", "?", "!"]

    def evaluate(self):
        accQA, accQuesType, accAnsType = [], {}, {}
        for quesId in self.gts:
            answers = self.gts[quesId]["answers"]
            resAns = self.res[quesId]["answer"]
            if self.version == "2021":
                for ansDic in answers:
                    ansDic["answer"] = ansDic["answer"].replace("\n", " ").replace("\t", " ").strip()
                resAns = resAns.replace("\n", " ").replace("\t", " ").strip()
                if len(set(a["answer"] for a in answers)) > 1:
                    for ansDic in answers:
                        ansDic["answer"] = self.processDigitArticle(self.processPunctuation(ansDic["answer"]))
                    resAns = self.processDigitArticle(self.processPunctuation(resAns))
            else:
                resAns = resAns.replace("\n", " ").replace("\t", " ").strip()
                resAns = self.processDigitArticle(self.processPunctuation(resAns))
                if len(set(a["answer"] for a in answers)) > 1:
                    for ansDic in answers:
                        ansDic["answer"] = self.processPunctuation(ansDic["answer"])
            gtAcc = []
            for gtAnsDatum in answers:
                otherGTAns = [item for item in answers if item != gtAnsDatum]
                matchingAns = [item for item in otherGTAns if item["answer"] == resAns]
                gtAcc.append(min(1, float(len(matchingAns)) / 3))
            avgGTAcc = float(sum(gtAcc)) / len(gtAcc)
            accQA.append(avgGTAcc)
            accQuesType.setdefault(self.gts[quesId]["question_type"], []).append(avgGTAcc)
            accAnsType.setdefault(self.gts[quesId]["answer_type"], []).append(avgGTAcc)
            self.evalQA[quesId] = avgGTAcc
        self.accuracy["overall"] = round(100 * float(sum(accQA)) / len(accQA), self.n)
        self.accuracy["perAnswerType"] = {t: round(100 * float(sum(v)) / len(v), self.n) for t, v in accAnsType.items()}

    def processPunctuation(self, inText):
        outText = inText
        for p in self.punct:
            if (p + " " in inText or " " + p in inText) or (re.search(self.commaStrip, inText) is not None):
                outText = outText.replace(p, "")
            else:
                outText = outText.replace(p, " ")
        # The official call passes re.UNICODE (32) positionally, where re.sub takes `count`.
        return self.periodStrip.sub("", outText, count=int(re.UNICODE))

    def processDigitArticle(self, inText):
        outText = []
        for word in inText.lower().split():
            word = self.manualMap.setdefault(word, word)
            if word not in self.articles:
                outText.append(word)
        for wordId, word in enumerate(outText):
            if word in self.contractions:
                outText[wordId] = self.contractions[word]
        return " ".join(outText)


def _questions(cases, types=None):
    gts = {q: {"answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(g)],
               "question_type": "what", "answer_type": (types or ["other"] * len(cases))[q]}
           for q, (_, g) in enumerate(cases)}
    return gts, {q: {"answer": p} for q, (p, _) in enumerate(cases)}


def official(pred, gts, version):
    ev = OfficialVQAEval(*_questions([(pred, gts)]), version=version)
    ev.evaluate()
    return ev.evalQA[0]


ISSUE_CASES = [  # prediction, answers, official accuracy by version
    ("2", ["2"] * 2 + ["two"] * 8, {"2021": 1.0, "2016": 0.6}),
    ("dog", ["a dog"] * 3 + ["dog"] * 2 + ["puppy"] * 5, {"2021": 1.0, "2016": 0.6}),
    ("Two", ["2"] * 10, {"2021": 0.0, "2016": 1.0}),
    ("yes", ["Yes"] * 4 + ["yes"] * 6, {"2021": 1.0, "2016": 1.0}),
    ("Yes", ["Yes"] * 4 + ["no"] * 6, {"2021": 1.0, "2016": 0.0}),  # 2016 lower-cases the prediction only
    ("a dog.", ["dog"] * 3 + ["cat"] * 7, {"2021": 0.9, "2016": 0.9}),
    ("  two\n", ["two"] * 10, {"2021": 1.0, "2016": 0.0}),
]


@pytest.mark.parametrize("version", VQA_EVAL_VERSIONS)
@pytest.mark.parametrize("pred,gts,expected", ISSUE_CASES)
def test_named_cases_equal_the_official_code(version, pred, gts, expected):
    assert official(pred, gts, version) == pytest.approx(expected[version], abs=1e-12)
    assert vqa_accuracy(pred, gts, version) == pytest.approx(expected[version], abs=1e-12)


_WORDS = ["yes", "no", "2", "two", "Two", "TWO", "10", "ten", "0", "none", "zero", "1,000", "1000", "3.5",
          "dog", "Dog", "dogs", "a dog", "the dog", "an apple", "apple", "red", "white", "black and white",
          "black/white", "t-shirt", "t shirt", "dont", "don't", "Im", "im", "youre", "its", "it's", "left",
          "on left", "hot dog", "hot-dog", "5:00", "a.m.", "dr. pepper", "n/a", "(dog)", "mcdonald's"]
_DECOR = ["", "", "", ".", "!", "?", ",", " .", "..", " ", "\n", "\t", "'"]


def _variant(rng: random.Random, word: str) -> str:
    if rng.random() < 0.3:
        word = rng.choice(["a ", "the ", "A ", "an ", ""]) + word
    if rng.random() < 0.2:
        word = word.upper() if rng.random() < 0.5 else word.capitalize()
    return rng.choice(["", "", " ", "\t"]) + word + rng.choice(_DECOR)


def _random_case(rng: random.Random) -> tuple[str, list[str]]:
    cluster = rng.sample(_WORDS, rng.randint(1, 3))
    if rng.random() < 0.3:  # unanimous annotators
        gts = [_variant(rng, cluster[0])] * 10
    else:
        gts = [_variant(rng, rng.choice(cluster)) if rng.random() < 0.7 else rng.choice(cluster) for _ in range(10)]
    pred = _variant(rng, rng.choice(cluster if rng.random() < 0.8 else _WORDS))
    return pred, gts


@pytest.mark.parametrize("version", VQA_EVAL_VERSIONS)
def test_thousands_of_random_cases_equal_the_official_code(version):
    rng = random.Random(0)
    cases = [_random_case(rng) for _ in range(3000)]
    types = [rng.choice(["yes/no", "number", "other"]) for _ in cases]
    ev = OfficialVQAEval(*_questions(cases, types), version=version, n=12)
    ev.evaluate()
    ours = [vqa_accuracy(p, g, version) for p, g in cases]
    assert ours == pytest.approx([ev.evalQA[q] for q in range(len(cases))], abs=1e-12)
    # The generator reaches every score level and both versions' rules: not a trivial agreement.
    assert {round(a, 1) for a in ours} >= {0.0, 0.3, 0.6, 0.9, 1.0}
    other = "2016" if version == "2021" else "2021"
    assert sum(a != vqa_accuracy(p, g, other) for a, (p, g) in zip(ours, cases)) > 100
    by_type = vqa_accuracy_by_type([p for p, _ in cases], [g for _, g in cases], types, version)
    assert 100 * by_type.pop("overall") == pytest.approx(ev.accuracy["overall"], abs=1e-9)
    assert {t: 100 * v for t, v in by_type.items()} == pytest.approx(ev.accuracy["perAnswerType"], abs=1e-9)


def test_breakdown_by_answer_type():
    cases = [("yes", ["yes"] * 10), ("no", ["yes"] * 10), ("2", ["2"] * 3 + ["3"] * 7), ("red", ["red"] * 10)]
    out = vqa_accuracy_by_type([p for p, _ in cases], [g for _, g in cases], ["yes/no", "yes/no", "number", "other"])
    assert out == pytest.approx({"overall": (1 + 0 + 0.9 + 1) / 4, "yes/no": 0.5, "number": 0.9, "other": 1.0})
    assert vqa_accuracy_by_type(["yes"], [["yes"] * 10]) == {"overall": 1.0}
    with pytest.raises(ValueError, match="unknown vqaEval.py version"):
        vqa_accuracy("yes", ["yes"], version="2015")
    with pytest.raises(ValueError, match="2 answer types for 1 predictions"):
        vqa_accuracy_by_type(["yes"], [["yes"]], ["yes/no", "other"])


@pytest.mark.parametrize("version", VQA_EVAL_VERSIONS)
def test_vqa_task_reports_the_server_breakdown(tmp_path, version):
    """``VQATask.metrics`` (what ``results.json`` holds) against the port run on the annotation file."""
    import json
    import types

    import torch

    from beit3.jobs.finetune.recipes import FinetuneConfig
    from beit3.jobs.finetune.tasks import VQATask

    rng = random.Random(1)
    cases = [_random_case(rng) for _ in range(60)]
    kinds = [("yes/no", "is"), ("number", "how many"), ("other", "what color")]
    qtypes = [kinds[i % 3] for i in range(len(cases))]
    anns = [{"question_id": 100 + q, "image_id": q, "answer_type": t, "question_type": qt,
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(g)]}
            for q, ((_, g), (t, qt)) in enumerate(zip(cases, qtypes))]
    path = tmp_path / "v2_mscoco_val2014_annotations.json"
    path.write_text(json.dumps({"annotations": anns}))
    label2ans = sorted({p for p, _ in cases})
    dataset = types.SimpleNamespace(label2ans=label2ans)
    rows = {"questions": {"pred": torch.tensor([label2ans.index(p) for p, _ in cases]),
                          "qid": torch.tensor([100 + q for q in range(len(cases))])}}
    task = VQATask(FinetuneConfig(task="vqa", vqa_eval=version), annotations=str(path))
    out = task.metrics(rows, dataset)

    ev = OfficialVQAEval(*_questions(cases, [t for t, _ in qtypes]), version=version)
    ev.evaluate()
    assert round(100 * out["vqa_accuracy"], 2) == ev.accuracy["overall"]
    for t, key in (("yes/no", "yes_no"), ("number", "number"), ("other", "other")):
        assert round(100 * out[f"vqa_accuracy_{key}"], 2) == ev.accuracy["perAnswerType"][t]
    assert len({out["vqa_accuracy_yes_no"], out["vqa_accuracy_number"], out["vqa_accuracy_other"]}) == 3
