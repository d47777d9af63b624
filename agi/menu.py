"""The IVR self-service menu (``*101``) as a pure state machine: what to say, how many
digits to collect, which effect to ask for. No I/O here: ``agi/ivr.py`` says the steps,
collects the digits over AGI and carries the effects out against Redis.

    start: Load the account; no PIN set -> End
    PIN:   up to 8 digits and '#'; CheckPin: OK -> main, WRONG -> again (3 tries), LOCKED -> End
    main:  the balance, the low-balance setting, then the options:
           1..n  add a preset amount from the stored card -> confirm (1) -> TopUp -> Load
           7     automatic top-up on/off (only with a stored card) -> SetAuto -> Load
           8     a new PIN, entered twice -> SavePin
           9     say it all again; no key -> again, twice, then goodbye
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from agi.speech import Step, amount_speech, balance_speech
from prepaid.errors import InputError
from prepaid.pins import PinCheck, check_pin
from prepaid.selfservice import TopupResult

MAX_PRESETS = 6  # digits 1-6; the fixed options use 7, 8, 9
AUTO_DIGIT, PIN_DIGIT, REPEAT_DIGIT = "7", "8", "9"
PIN_TRIES = 3
SILENT_REPEATS = 2  # the main menu is said again this often when no key is pressed
PIN_DIGITS = 8


def _f(*names: str) -> tuple[Step, ...]:
    return tuple(("file", f"prepaid/{name}") for name in names)


@dataclass(frozen=True, slots=True)
class View:
    """What the menu says about the account (read again after every change)."""

    currency: str
    balance: int
    threshold: int = 0
    action: str = "none"
    policy_enabled: bool = False
    topup_amount: int = 0
    has_card: bool = False
    card_last4: str = ""
    has_pin: bool = True

    @property
    def auto_on(self) -> bool:
        return self.has_card and self.policy_enabled and self.action == "topup"


# -- effects the menu asks for --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Load:
    pass


@dataclass(frozen=True, slots=True)
class CheckPin:
    pin: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class TopUp:
    amount: int


@dataclass(frozen=True, slots=True)
class SetAuto:
    on: bool


@dataclass(frozen=True, slots=True)
class SavePin:
    pin: str = field(repr=False)


Effect = Load | CheckPin | TopUp | SetAuto | SavePin


# -- what the driver does next --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ask:
    """Say ``speech`` (a key press cuts it short), then collect up to ``digits`` digits;
    ``pin``: a PIN entry, ended by '#', said by GET DATA so no digit lands in a variable."""

    speech: tuple[Step, ...]
    digits: int = 1
    pin: bool = False


@dataclass(frozen=True, slots=True)
class Do:
    effect: Effect
    speech: tuple[Step, ...] = ()  # said first


@dataclass(frozen=True, slots=True)
class End:
    speech: tuple[Step, ...]


Out = Ask | Do | End


class Stage(enum.Enum):
    START = "start"
    PIN = "pin"
    MAIN = "main"
    CONFIRM = "confirm"
    NEW_PIN = "new-pin"
    REPEAT_PIN = "repeat-pin"


def setting_speech(view: View) -> list[Step]:
    """'When your balance falls below 5 euros, we add 20 euros from your card' (or 'we send
    you an e-mail', or 'there is no low balance alert')."""
    if view.policy_enabled and view.action in ("topup", "email") and view.threshold > 0:
        steps = [*_f("when-below"), *amount_speech(view.threshold, view.currency)]
        if view.action == "email":
            return [*steps, *_f("we-email-you")]
        if view.auto_on:
            return [*steps, *_f("we-add"), *amount_speech(view.topup_amount, view.currency),
                    *_f("from-your-card")]
    return list(_f("no-low-balance-action"))


def options_speech(view: View, presets: tuple[int, ...]) -> list[Step]:
    """'To add 10 euros from your card ending 4 2 4 2, press 1; 20 euros, press 2; ...'"""
    steps: list[Step] = []
    if view.has_card and presets:
        for n, amount in enumerate(presets, 1):
            if n == 1:
                steps += [*_f("to-add"), *amount_speech(amount, view.currency),
                          *_f("from-card-ending"), ("digits", view.card_last4)]
            else:
                steps += amount_speech(amount, view.currency)
            steps += [*_f("press"), ("digits", str(n))]
        steps += [*_f("auto-off-option" if view.auto_on else "auto-on-option", "press"),
                  ("digits", AUTO_DIGIT)]
    else:
        steps += _f("no-card")
    return [*steps, *_f("change-pin-option", "press"), ("digits", PIN_DIGIT),
            *_f("repeat-option", "press"), ("digits", REPEAT_DIGIT)]


OUTCOME_PROMPTS = {"credited": "topup-done", "declined": "card-declined",
                   "refused": "topup-refused", "failed": "topup-failed",
                   "abandoned": "topup-try-later", "pending": "topup-pending"}


class Menu:
    """One caller's pass through the menu; feed it the caller's digits and each effect's
    result, in the order it asks for them."""

    def __init__(self, presets: tuple[int, ...]) -> None:
        self.presets = tuple(presets[:MAX_PRESETS])
        self.stage = Stage.START
        self.view: View | None = None
        self.tries = 0
        self.silent = 0
        self.amount = 0  # the top-up being confirmed
        self.auto = False  # what SetAuto asked for
        self._first_pin = ""
        self.note: tuple[Step, ...] = ()  # said before the main menu next time

    def start(self) -> Out:
        return Do(Load())

    # -- results of effects ----------------------------------------------------------
    def loaded(self, view: View | None) -> Out:
        if view is None:
            return End(_f("account-unknown"))
        first, self.view = self.view is None, view
        if not first:
            return self._main()
        if not view.has_pin:
            return End(_f("no-pin", "goodbye"))
        return self._ask_pin(())

    def pin_checked(self, check: PinCheck) -> Out:
        if check is PinCheck.OK:
            return self._main()
        if check is PinCheck.LOCKED:
            return End(_f("pin-locked", "goodbye"))
        if check is PinCheck.NO_PIN:
            return End(_f("no-pin", "goodbye"))
        self.tries += 1
        if self.tries >= PIN_TRIES:
            return End(_f("pin-wrong", "goodbye"))
        return self._ask_pin(_f("pin-wrong"))

    def topped_up(self, result: TopupResult) -> Out:
        self.note = _f(OUTCOME_PROMPTS.get(result.state, "topup-failed"))
        return Do(Load())

    def auto_set(self, done: bool) -> Out:
        self.note = _f(("auto-now-on" if self.auto else "auto-now-off") if done
                       else "auto-not-set-up")
        return Do(Load())

    def pin_saved(self) -> Out:
        self.note = _f("pin-changed")
        return self._main()

    # -- the caller's digits ('' when none came in time) -------------------------------
    def keyed(self, digits: str) -> Out:
        if self.stage is Stage.PIN:
            return Do(CheckPin(digits)) if digits else self.pin_checked(PinCheck.WRONG)
        if self.stage is Stage.CONFIRM:
            return self._confirmed(digits)
        if self.stage is Stage.NEW_PIN:
            return self._new_pin(digits)
        if self.stage is Stage.REPEAT_PIN:
            return self._repeat_pin(digits)
        return self._chosen(digits)

    def _chosen(self, digits: str) -> Out:
        view = self._view()
        if not digits:
            self.silent += 1
            return End(_f("goodbye")) if self.silent > SILENT_REPEATS else self._main()
        self.silent = 0
        key = digits[0]
        offered = view.has_card and bool(self.presets)
        if offered and key.isdigit() and 1 <= int(key) <= len(self.presets):
            self.amount, self.stage = self.presets[int(key) - 1], Stage.CONFIRM
            return Ask((*_f("you-chose"), *amount_speech(self.amount, view.currency),
                        *_f("from-card-ending"), ("digits", view.card_last4),
                        *_f("confirm-or-cancel")))
        if offered and key == AUTO_DIGIT:
            self.auto = not view.auto_on
            return Do(SetAuto(self.auto))
        if key == PIN_DIGIT:
            self.stage = Stage.NEW_PIN
            return Ask(_f("enter-new-pin"), PIN_DIGITS, pin=True)
        if key == REPEAT_DIGIT:
            return self._main()
        self.stage = Stage.MAIN
        return Ask((*_f("invalid-choice"), *options_speech(view, self.presets)))

    def _confirmed(self, digits: str) -> Out:
        if digits == "1":
            return Do(TopUp(self.amount), _f("one-moment"))
        self.note = _f("not-charged")
        return self._main()

    def _new_pin(self, digits: str) -> Out:
        try:
            self._first_pin = check_pin(digits)
        except InputError:
            self.note = _f("pin-invalid")
            return self._main()
        self.stage = Stage.REPEAT_PIN
        return Ask(_f("repeat-new-pin"), PIN_DIGITS, pin=True)

    def _repeat_pin(self, digits: str) -> Out:
        pin, self._first_pin = self._first_pin, ""
        if digits != pin:
            self.note = _f("pins-differ")
            return self._main()
        return Do(SavePin(pin))

    # -- what is said ----------------------------------------------------------------
    def _view(self) -> View:
        assert self.view is not None, "the account is loaded first"
        return self.view

    def _ask_pin(self, before: tuple[Step, ...]) -> Ask:
        self.stage = Stage.PIN
        return Ask((*before, *_f("enter-pin")), PIN_DIGITS, pin=True)

    def _main(self) -> Ask:
        view = self._view()
        self.stage = Stage.MAIN
        note, self.note = self.note, ()
        return Ask((*note, *balance_speech(view.balance, view.currency), *setting_speech(view),
                    *options_speech(view, self.presets)))
